"""TurboBooth as an HTTP service: a thin front over manager/ and trainer/ (no model logic here).

``python -m turbobooth serve --model tiny`` runs :func:`turbobooth.serve.app.create_app` under uvicorn.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client, python-multipart); imports happen on first use.
"""

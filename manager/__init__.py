"""The shared cached model manager. Importable and usable without ComfyUI.

Heavy libraries (torch, diffusers, transformers) are imported on first use.
"""

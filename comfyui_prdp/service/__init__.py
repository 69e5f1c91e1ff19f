"""The training service inside ComfyUI: background jobs and the HTTP routes."""

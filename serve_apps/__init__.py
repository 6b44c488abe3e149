"""Ray Serve applications (FastAPI ingress) and their serve configs."""

"""`imagegen serve`: a small review server (Starlette + uvicorn, the `serve` extra) over the
run folders under a directory: progress, galleries, compare, upscaled deliveries, and picks
saved to picks.txt. starlette and uvicorn are imported only inside this package.
"""

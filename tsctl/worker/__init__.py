"""The worker process: loads one model's handler once, then serves batches from the frontend.

Each worker is its own OS process, single-threaded: it blocks on its socket, runs one batch at
a time, and never talks to clients. The frontend starts, supervises and replaces workers.
"""

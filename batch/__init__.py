"""`dsocr batch`: whole collections of images and PDFs into one output folder, exactly once, resumable.

inputs.py expands the command line into documents and their pages (the units of work); run.py OCRs
units on an engine (continuous batching, retries) into outcomes (a record and the page's files);
store.py is the output folder, the one writer of outcomes. A driver feeding the store with outcomes
from elsewhere (other processes, other machines) reuses the last two apart.
"""

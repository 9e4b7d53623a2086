"""Making received instances durable: the write-ahead journal, the ingest thread that writes
files and rows, and the instance and result files.
"""

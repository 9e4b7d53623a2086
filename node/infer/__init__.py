"""Running models: the worker process, volume building, radiograph preprocessing and model
loading.
"""

"""From instances to jobs: study completion after a quiet period, and routing rules that match
series to models.
"""

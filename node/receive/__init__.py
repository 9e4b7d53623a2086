"""Receiving DICOM: the C-STORE/C-ECHO handlers, the association server, acceptor processes and
their hand-off channel, and the pynetdicom fast path.
"""

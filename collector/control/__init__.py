"""The control side: the NOTIFY process of a fleet (``python -m collector.control``).

It uses the shared modules and the fleet side (program files, supervisord),
never the worker side.
"""

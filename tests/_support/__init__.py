"""Helpers shared by the unit and integration tests (no fixtures, no tests).

``wrappers`` holds the store wrappers that count, gate and fail writes; ``helpers`` the
states, the waiting helpers and the exceptions the lifecycle tests raise.
"""

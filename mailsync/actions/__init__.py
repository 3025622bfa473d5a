"""The client half: reading one message whole and acting on it (read, flag, move, delete).

``models`` holds the provider-neutral records, ``service`` the optimistic
store update and the provider call (see docs/actions.md).
"""

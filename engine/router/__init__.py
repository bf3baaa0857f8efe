"""Data-parallel routing: the approximate prefix tree, the policies, the replica processes
(no server stack; the HTTP proxy is engine/server/router.py)."""

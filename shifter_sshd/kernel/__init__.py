"""The privileged core: every mount, umount, chown, loop attach and root write of the
job path, on file descriptors; the system calls Python lacks; the user's children
with deadlines. A security reviewer starts here (docs/security.md: the audit surface).
"""

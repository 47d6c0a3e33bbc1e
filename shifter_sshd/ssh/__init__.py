"""The job's ssh: per-job keys and certificates, the sshd/ssh configs, the ssh files in
the container, the sshd process, and the relocatable OpenSSH bundle (udiImage).
"""

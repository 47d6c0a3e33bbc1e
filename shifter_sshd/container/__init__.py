"""The job's container root, built by the prolog: its mounts, /dev, /etc, volumes,
environment, /var/hostsfile and the user namespace holder.
"""

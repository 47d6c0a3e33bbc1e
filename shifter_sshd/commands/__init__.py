"""The installed commands: shifter-sshd (cli), the prolog/epilog entry points, shifter
(and how it enters the container), shifterimg, and the launchers' first lines.
"""

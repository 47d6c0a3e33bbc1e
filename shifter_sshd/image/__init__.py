"""The image store and how it is filled: names, OCI layouts, layers merged into one
squashfs, registry pulls through skopeo.
"""

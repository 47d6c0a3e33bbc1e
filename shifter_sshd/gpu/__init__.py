"""The job's GPUs from the site's CDI specs: the plan, the spec reader, a spec made from
the installed driver, and the container's loader cache.
"""

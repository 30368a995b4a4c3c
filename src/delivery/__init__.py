"""The delivery pipeline's library: security findings and policy, tags, environments, deploys.

Never shipped in the runtime image; noxfile.py and tasks.py stay thin and call into it.
"""

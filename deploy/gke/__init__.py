"""vitpod on GKE (`python3 -m deploy.gke VERB`): the container image and the JobSet that runs
one training run on TPU node pools. Standard library only, like the rest of deploy/.
"""

"""`make pod-sim`: a simulated gcloud, TPU image and spot capacity on localhost, and a GCS
emulator (also the tests')."""

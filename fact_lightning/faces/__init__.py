"""The face pipeline shared by shard building, inference and evaluation.

decode (safe image bytes -> RGB), detectors (faces, 5 landmarks, face/head regions), alignment and masks
(pure geometry), reference (the face policy and the aligned, head-masked 112x112 face the encoder reads),
encoding (batched face-encoder tokens) and identity (embeddings and the majority-vote identity check).
"""

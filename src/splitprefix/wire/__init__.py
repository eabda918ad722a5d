"""The protocol both parties speak: tensors as safetensors blobs, control data as JSON metadata."""

"""Data: manifests, image decoding, Ray Data datasets of decoded images, transforms, and the validation job."""

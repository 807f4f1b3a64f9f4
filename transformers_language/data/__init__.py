"""The data wing: text blocks (tokenized, in a block layout, cached) and image datasets (hub or class folders,
torchvision transforms), behind one modality interface per kind of input."""

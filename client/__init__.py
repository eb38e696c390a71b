"""Site side of the federation: the Flower ClientApp and local training and evaluation."""

"""Coordinator side of the federation: the Flower ServerApp, strategy and capacity ledger."""

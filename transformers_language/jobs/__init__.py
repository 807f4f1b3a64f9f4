"""The jobs: the typed flags of each entry point resolved into a Plan, pre-training and validation, and the
generated flag reference."""

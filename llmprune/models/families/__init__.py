"""Adapters of families whose decoder layers differ from Llama's layout, one module each.

Every module here is imported by llmprune.models.adapters and registers its adapter with
``register_adapter``: adding a family is adding a file.
"""

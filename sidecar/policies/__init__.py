"""Policies: one module per resilience or traffic policy, each a stage of the pipeline."""

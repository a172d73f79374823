"""The data layer: corpus sources, cleaning and splitting, and the two on-disk formats the stages hand on,
data/prepared and data/processed (`datasets` lives here, never in the network layer)."""

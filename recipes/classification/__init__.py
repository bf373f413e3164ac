"""Classification recipe: image and tabular data (digits, IDX files, synthetic) and the study CNN and MLP."""

"""The paper's protocol: the experiment grid, its report with paired comparisons, and the demo."""

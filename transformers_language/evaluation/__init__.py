"""The evaluation wing: the evaluation loop, streaming activation and attention statistics (reduced inside
the hooks), the outlier report and its plots."""

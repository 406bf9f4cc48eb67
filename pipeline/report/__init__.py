"""`stm report`: evaluation runs -> the ablation tables and chart (stage report)."""

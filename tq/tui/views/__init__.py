"""The five views of ``tq top`` (one tab each): overview, workers, tasks, dead letters, cluster."""

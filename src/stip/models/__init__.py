"""Models that ship with stip or exist for the baselines."""

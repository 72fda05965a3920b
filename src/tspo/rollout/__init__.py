"""tspo.rollout"""

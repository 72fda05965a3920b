"""tspo.integrations.verl"""

"""tspo.integrations"""

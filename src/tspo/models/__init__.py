"""tspo.models"""

"""tspo.data"""

import data
def value(token):
    if token in data:
        return data[token]
    else:
        return token

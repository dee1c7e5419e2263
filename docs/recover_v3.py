#!/usr/bin/env python3
"""Decrypts a dbkeeper v3 archive given its data key (hex), without dbkeeper.
Usage: recover.py ARCHIVE DK_HEX > plaintext (still compressed as the header says)."""
import hashlib, hmac, json, struct, sys
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

def rotl(v, c): return ((v << c) & 0xffffffff) | (v >> (32 - c))
def qr(s, a, b, c, d):
    s[a] = (s[a] + s[b]) & 0xffffffff; s[d] = rotl(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & 0xffffffff; s[b] = rotl(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b]) & 0xffffffff; s[d] = rotl(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & 0xffffffff; s[b] = rotl(s[b] ^ s[c], 7)
def hchacha20(key, nonce16):
    s = [0x61707865, 0x3320646e, 0x79622d32, 0x6b206574]
    s += list(struct.unpack('<8I', key)) + list(struct.unpack('<4I', nonce16))
    for _ in range(10):
        qr(s, 0, 4, 8, 12); qr(s, 1, 5, 9, 13); qr(s, 2, 6, 10, 14); qr(s, 3, 7, 11, 15)
        qr(s, 0, 5, 10, 15); qr(s, 1, 6, 11, 12); qr(s, 2, 7, 8, 13); qr(s, 3, 4, 9, 14)
    return struct.pack('<8I', *(s[0:4] + s[12:16]))
def xchacha_open(key, nonce24, ct, aad):
    sub = hchacha20(key, nonce24[:16])
    return ChaCha20Poly1305(sub).decrypt(b'\0' * 4 + nonce24[16:], ct, aad)

data = open(sys.argv[1], 'rb').read()
dk = bytes.fromhex(sys.argv[2].strip())
assert data[:8] == b'DBKEEPER' and data[8] == 3
E = struct.unpack('>I', data[9:13])[0]
env_end = 13 + E
tag = data[env_end:env_end + 32]
k_mac = hashlib.sha256(b'dbkeeper v3 mac' + dk).digest()
assert hmac.compare_digest(hmac.new(k_mac, data[:env_end], hashlib.sha256).digest(), tag), 'envelope altered'
env = json.loads(data[13:env_end])
k_inner = hashlib.sha256(b'dbkeeper v3 inner' + dk).digest()
inner = xchacha_open(k_inner, bytes.fromhex(env['inner_nonce']), bytes.fromhex(env['inner']), b'dbkeeper inner header v3')
header = json.loads(inner)
print(inner.decode(), file=sys.stderr)
seg = header['segment_size'] + 16
prefix = bytes.fromhex(header['encryption']['nonce_prefix'])
body = data[env_end + 32:]
out = sys.stdout.buffer
i = 0
while True:
    chunk = body[i * seg:(i + 1) * seg]
    last = (i + 1) * seg >= len(body)
    nonce = prefix + struct.pack('>I', i) + bytes([1 if last else 0])
    out.write(xchacha_open(dk, nonce, chunk, inner))
    if last:
        break
    i += 1

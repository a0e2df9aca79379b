#!/usr/bin/env python3
"""Kernel slab memory per idle established loopback TCP socket: opens 4,000 connection pairs
(8,000 sockets) and reads Slab / SUnreclaim from /proc/meminfo before and after.
Run: python3 benches/kernel_socket_memory.py"""
import socket, time, resource, json
def slab():
    d={}
    for line in open('/proc/meminfo'):
        k,v=line.split(':'); d[k]=int(v.split()[0])*1024
    return d['Slab'], d['SUnreclaim']
N=4000
resource.setrlimit(resource.RLIMIT_NOFILE,(20000,20000))
ls=socket.socket(); ls.bind(('127.0.0.1',0)); ls.listen(4096); port=ls.getsockname()[1]
time.sleep(0.5)
s0,u0=slab()
pairs=[]
for i in range(N):
    c=socket.socket(); c.bind(('127.0.0.%d'%(2+i%8),0)); c.connect(('127.0.0.1',port)); a,_=ls.accept(); pairs.append((c,a))
time.sleep(1)
s1,u1=slab()
print(json.dumps({"sockets":2*N,"slab_delta_bytes":s1-s0,"per_socket":(s1-s0)/(2*N),"unreclaimable_per_socket":(u1-u0)/(2*N)}))

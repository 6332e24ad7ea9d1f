"""A model of the two-shot Lamport protocol (kernels/all_reduce_lamport2.py) in plain Python: W
ranks, G CTAs each, every push / clear / poll of a chunk one step, steps of all CTAs interleaved
at random; checks that no schedule hangs and every rank gets the sum (values encode the call, so a
stale word shows).  It mirrors the kernel's arithmetic (shards, clear ranges, slot rotation), not
its code: ``python3 scripts/model_lamport2.py`` (no GPU)."""
import random, numpy as np
UNIT=4096; CAP=65536
def cdiv(a,b): return -(-a//b)
def run(W, calls, seed):
    rnd=random.Random(seed)
    RS=[np.zeros((3,W,CAP),np.int32) for _ in range(W)]
    AG=[np.zeros((3,CAP),np.int32) for _ in range(W)]
    ctl=[[0,0] for _ in range(W)]   # s, prev(elements)
    def cta(r, ci, n, G, BLOCK, pid):
        s, prev = ctl[r]
        n8 = cdiv(n,8)*8
        nblk=cdiv(n8,BLOCK)
        S=cdiv(cdiv(n8,W),UNIT)*UNIT
        val = lambda rr: ci*100+rr+1
        for it in range(pid,nblk,G):
            o0,o1=it*BLOCK,min(it*BLOCK+BLOCK,n8)
            owner=(it*BLOCK)//S
            RS[owner][s,r,o0:o1]=val(r); yield
        old=(s+2)%3
        Sp=cdiv(cdiv(prev,W),UNIT)*UNIT
        lo=min(r*Sp,prev); hi=min(lo+Sp,prev)
        for it in range(pid, cdiv(hi-lo,BLOCK), G):
            a=lo+it*BLOCK; b=min(a+BLOCK, hi)
            RS[r][old,:,a:b]=0; yield
        for it in range(pid, cdiv(prev,BLOCK), G):
            AG[r][old,it*BLOCK:min(it*BLOCK+BLOCK,prev)]=0; yield
        lo=r*S; hi=min(lo+S,n8)
        for it in range(pid, nblk, G):
            if not (lo <= it*BLOCK < hi): continue
            a=it*BLOCK; b=min(a+BLOCK,hi)
            while (RS[r][s,:,a:b]==0).any(): yield 'wait'
            tot=RS[r][s,:,a:b].sum(0)
            for q in range(W): AG[q][s,a:b]=tot
            yield
        res=np.zeros(n8,np.int32)
        for it in range(pid,nblk,G):
            a=it*BLOCK; b=min(a+BLOCK,n8)
            while (AG[r][s,a:b]==0).any(): yield 'wait'
            res[a:b]=AG[r][s,a:b]; yield
        yield ('done', res, pid, G, BLOCK)
    # per rank: list of active generators for current call
    cur=[0]*W; active=[[] for _ in range(W)]; parts=[[] for _ in range(W)]
    def start(r):
        ci=cur[r]
        if ci>=len(calls): return
        n,G,BLOCK=calls[ci]
        active[r]=[cta(r,ci,n,G,BLOCK,p) for p in range(G)]; parts[r]=[]
    for r in range(W): start(r)
    stall=0
    while any(active):
        r=rnd.choice([q for q in range(W) if active[q]])
        g=rnd.choice(active[r])
        x=next(g)
        if x=='wait':
            stall+=1
            if stall>200000: return f"DEADLOCK call {cur}"
            continue
        stall=0
        if isinstance(x,tuple):
            active[r].remove(g); parts[r].append(x)
            if not active[r]:
                n,G,BLOCK=calls[cur[r]]
                n8=cdiv(n,8)*8
                out=np.zeros(n8,np.int32)
                for _,res,pid,GG,B in parts[r]:
                    for it in range(pid,cdiv(n8,B),GG):
                        out[it*B:min(it*B+B,n8)]=res[it*B:min(it*B+B,n8)]
                exp=sum(cur[r]*100+q+1 for q in range(W))
                if not (out==exp).all(): return f"WRONG rank {r} call {cur[r]} {calls[cur[r]]} bad={np.nonzero(out!=exp)[0][:5]} vals={out[out!=exp][:5]}"
                ctl[r]=[(ctl[r][0]+1)%3, n8]
                cur[r]+=1; start(r)
    return "ok"

if __name__=='__main__':
  for seed in range(300):
    rnd=random.Random(seed)
    W=rnd.choice([2,4])
    calls=[(rnd.choice([1,8,9,1000,5120,4096*3+5,30000,60000]), rnd.choice([1,2,3,8]), rnd.choice([1024,2048,4096])) for _ in range(8)]
    r=run(W,calls,seed)
    if r!="ok": print(seed,W,calls,r); break
  else: print("random ok")

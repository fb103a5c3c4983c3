import sys, collections
TYPES={"PER","ORG","LOC","MISC"}
for path in sys.argv[1:]:
    errs=[]; sents=0; toks=0; docs=0; ents=collections.Counter(); cur=[]; prev='O'
    lines=open(path,encoding='utf-8').read().split('\n')
    for i,l in enumerate(lines,1):
        if l=='' :
            if cur: sents+=1; cur=[]
            prev='O'; continue
        c=l.split(' ')
        if len(c)!=4 or any(x=='' for x in c): errs.append((i,'cols',l)); continue
        if any(ch.isspace() and ch not in ' ' for ch in l): errs.append((i,'ws',l))
        if c[0]=='-DOCSTART-':
            if l!='-DOCSTART- -X- -X- O': errs.append((i,'docstart',l))
            if cur: errs.append((i,'docstart inside sentence',l))
            if i<len(lines) and lines[i]!='': errs.append((i,'no blank after docstart',l))
            docs+=1; continue
        tag=c[3]; cur.append(c[0]); toks+=1
        if c[1]!='_' or c[2]!='_': errs.append((i,'mid cols',l))
        if tag!='O':
            p,_,t=tag.partition('-')
            if p not in ('B','I') or t not in TYPES: errs.append((i,'bad tag',l))
            elif p=='I' and prev[2:]!=t: errs.append((i,'I- without B-/I- of same type',l))
            if p=='B': ents[t]+=1
        prev=tag
    if cur: sents+=1
    print(f"{path}: docs={docs} sentences={sents} tokens={toks} entities={sum(ents.values())} "+' '.join(f'{t}={ents[t]}' for t in ('PER','ORG','LOC','MISC')))
    print("  errors:",len(errs)); [print('  ',e) for e in errs[:20]]

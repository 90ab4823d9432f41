# Completes a command line in a real interactive zsh (through a pseudo-terminal) and prints
# each candidate on a line of its own: zsh -f zsh-complete.zsh FPATH_DIR 'ws-guard limits '
# (tests/completions.rs). Every candidate the completion system adds is printed as it is
# added, by a compadd wrapper; the line is completed with a Tab.
zmodload zsh/zpty || { print -u2 'zsh/zpty is missing'; exit 2 }
zpty z zsh -f -i
zpty -w z "PROMPT='> '; fpath=($1 \$fpath); autoload -U compinit; compinit -u -D"
zpty -w z 'compadd () { builtin compadd -O __hits "$@"; print -r -- "HITS:${(pj:\t:)__hits}"; builtin compadd "$@" }'
zpty -w z 'finish () { print -r -- "<<END>>" }; comppostfuncs=(finish)'
zpty -n -w z "$2"$'\t'
integer n=0
while (( n++ < 500 )); do
  zpty -rt z line || { sleep 0.05; continue }
  [[ $line == '<<END>>'* ]] && break
  if [[ $line == HITS:* ]]; then
    line=${line#HITS:}
    line=${line%%$'\r'*}
    print -rl -- ${(ps:\t:)line}
  fi
done
zpty -d z

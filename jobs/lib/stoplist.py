"""The English stoplist the keyphrase, keyword and validator code share: function words (after the
classic Glasgow/Snowball lists) plus the filler verbs and time words every diary entry uses."""
from __future__ import annotations

_FUNCTION = """
a about above across after afterwards again against all almost alone along already also although
always am among amongst an and another any anyhow anyone anything anyway anywhere are around as at
back be became because become becomes becoming been before beforehand behind being below beside
besides between beyond both but by can cannot could couldn't did didn't do does doesn't doing done
don't down due during each either else elsewhere enough etc even ever every everyone everything
everywhere except few for former formerly from further had hadn't has hasn't have haven't having
he he's hence her here hers herself him himself his how however i i'd i'll i'm i've if in indeed
into is isn't it it's its itself just least less many may me meanwhile might mine more moreover
most mostly much must my myself neither never nevertheless next no nobody none noone nor not
nothing now nowhere of off often on once one only onto or other others otherwise our ours
ourselves out over own per perhaps quite rather same seem seemed seeming seems several she should
since so some somehow someone something sometime sometimes somewhere still such than that that's
the their theirs them themselves then thence there there's thereafter thereby therefore these they
they're this those though through throughout thus to together too toward towards under until up
upon us very via was wasn't we we're were weren't what whatever when whenever where whereas
wherever whether which while who whoever whole whom whose why will with within without won't would
wouldn't yet you you're your yours yourself yourselves
"""
# Words that carry no theme in personal notes: filler verbs, vague nouns, time words, numbers.
_FILLER = """
actually almost already appeared asked bit came come comes coming day days did felt feel feels
find first found gave get gets getting give go goes going gone good got great kept know knew last
later let like little long look looked looking lot lots made make makes making maybe mean meant new
next night nine old put really said say says saw see seemed set since started still take taken
takes thing things think thought three time times today told took tried try trying two turned used
want wanted way week weeks well went whole year years yesterday afternoon morning evening weekend
four five six seven eight ten twelve
"""
STOPWORDS = frozenset((_FUNCTION + _FILLER).split())
FUNCTION_WORDS = frozenset(_FUNCTION.split())   # the claim check: a filler verb or "good" is a claim

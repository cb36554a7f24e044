"""The fixed, neutral worked examples the job prompts show a *base* model (it continues a pattern far
better than it follows a request). Never built from the user's data; a retry uses the next example."""
from __future__ import annotations

# (date, title, text, one-sentence summary)
NOTES = [
    ("2003-04-11", "Fixing the garden fence",
     "The storm last night knocked two panels of the fence flat. Tom from next door helped me set "
     "new posts in concrete, and by Sunday evening the fence stood again, straighter than before.",
     "After a storm flattened the fence, a neighbour helped me set new posts and rebuild it."),
    ("1998-09-02", "First week of the pottery class",
     "Signed up for the evening pottery class at the community centre. The clay kept collapsing on "
     "the wheel; the teacher says everyone needs about twenty bowls before one stands up.",
     "I started an evening pottery class and learned that centring clay on the wheel takes practice."),
    ("2001-06-30", "Lost luggage in Oslo",
     "The airline lost my suitcase on the way to Oslo, so I spent the first two days of the "
     "conference in one shirt. It turned up on the third day with a broken wheel.",
     "The airline lost my suitcase on a trip to Oslo and it came back three days later, damaged."),
]

# (note titles, keyphrases, theme title)
THEMES = [
    (["Fixing the garden fence", "Planting tomatoes", "The old apple tree"],
     ["garden", "tomato plants", "fence posts"], "Working in the garden"),
    (["First week of the pottery class", "A glaze that finally worked", "Selling bowls at the fair"],
     ["pottery", "clay", "glaze"], "Learning pottery"),
    (["Lost luggage in Oslo", "Night bus to Krakow", "A week in Porto"],
     ["travel", "luggage", "city trips"], "Trips abroad"),
]

# (title, text, one-sentence summary) for artifacts
ARTIFACTS = [
    ("Checklist for borrowing the van",
     "Before returning the club van: fill the tank, sweep the floor, note the mileage in the "
     "logbook and leave the key in the box by the door. Report any scratch the same day.",
     "A checklist for returning the club van: fuel, cleaning, mileage, key and damage reports."),
    ("Why the choir moved rehearsals",
     "We moved rehearsals from Monday to Thursday because half the tenors work late on Mondays. "
     "Attendance went from twelve to nineteen within a month.",
     "Choir rehearsals moved to Thursday so more tenors could come, and attendance rose to nineteen."),
]

# (job title, strengths with evidence, gaps, one connecting sentence)
RATIONALES = [
    ("Warehouse shift supervisor",
     ["forklift licence (CV: \"Licensed forklift driver since 2015\")",
      "leading a team (CV: \"Led a night shift of eight pickers\")"],
     ["SAP stock software"],
     "The candidate has run a warehouse shift and drives a forklift, and would need to learn SAP."),
    ("Primary school music teacher",
     ["teaching children (CV: \"Taught piano to children aged 6 to 12\")"],
     ["teaching degree", "choir conducting"],
     "The candidate teaches piano to children but lacks the teaching degree the school asks for."),
]


def rotate(items: list, start: int, count: int) -> list:
    """`count` examples starting at `start` (wrapping): each retry shows a different first one."""
    return [items[(start + i) % len(items)] for i in range(count)]

"""Prompt texts of every task, as data (recovered from DeepRetrieval's preprocessing scripts).

DeepRetrieval hand-wrote ChatML strings: `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user
\\n{instruction}{output format}{note}{input header}{input}...Assistant: Let me ... \\n<think>\\n`.
Here the same texts are split into named pieces that a `TaskSpec` references and a config can
replace; `tasks.render_prompt` joins them and renders them through the tokenizer's chat template.
Trailing spaces of the originals (`"} \\n"`) are dropped, and grammar is taken from the scripts
that had it right ("You first think ... and then provide").
"""

# --- System texts -------------------------------------------------------------------------------
# Publication / trial search (processed parquet files in DeepRetrieval's data release).
SYSTEM_PICO_REASONING = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant "
    "solves it. The Assistant first thinks about the reasoning process in the mind and then "
    "provides the User with the answer."
)
SYSTEM_REASONING = (
    "You are a helpful assistant. You first think about the reasoning process in the mind and "
    "then provide the user with the answer."
)
# `no_reason/SearchEngine/*.py`.
SYSTEM_DIRECT = "You are a helpful assistant. You directly provide the user with the answer."
# `no_reason/BM25/*.py`, `no_reason/Dense/*.py`.
SYSTEM_NO_REASONING = "You are a helpful assistant. You need to provide the user with the answer."

# --- Task instructions --------------------------------------------------------------------------
INSTRUCTION_PICO = """The Assistant is a clinical specialist. He is conducting research and doing \
a medical literature review. His task is to create query terms for a search URL to find relevant \
literature on PubMed or ClinicalTrials.gov.

The research is defined using the PICO framework:
P: Patient, Problem or Population - Who or what is the research about?
I: Intervention - What is the main intervention or exposure being considered?
C: Comparison - What is the intervention being compared to?
O: Outcome - What are the relevant outcomes or effects being measured?"""

INSTRUCTION_WIKI_BM25 = (
    "You are a query rewriting expert. Your task is to create query terms for user query to find "
    "relevant literature in a Wikipedia corpus using BM25."
)
INSTRUCTION_SCIFACT = (
    "You are a query generating expert. Given a scientific claim, your task is to create query "
    "terms to retrieve documents that support or refute the claim."
)
INSTRUCTION_FEVER = (
    "You are an expert in query generation. Given a claim, your task is to create query terms to "
    "retrieve documents that support or refute the claim."
)
INSTRUCTION_HOTPOTQA = (
    "You are an expert in query generation. Given a multi-hop question, your task is to create "
    "query terms to retrieve documents that can help answer the question."
)
INSTRUCTION_NFCORPUS = (
    "You are an expert in query generation. Given a question, your task is to create query terms "
    "to retrieve relevant documents that best answer the question."
)
INSTRUCTION_FIQA = (
    "You are an expert in query generation. Given a financial question, your task is to create "
    "query terms to retrieve user replies that best answer the question."
)
INSTRUCTION_MSMARCO_BEIR = (
    "You are an expert in query generation. Given a web search query, your task is to create "
    "query terms to retrieve relevant passages that answer the query."
)
INSTRUCTION_MSMARCO_SPARSE = (
    "You are a query rewriting expert. Your task is to augment the user query to find relevant "
    "literature in a corpus with sparse retrieval."
)
INSTRUCTION_MSMARCO_DENSE = (
    "You are a query rewriting expert. Your task is to augment the user query to find relevant "
    "literature in a corpus."
)
INSTRUCTION_SQL = (
    "You are a SQL query writing expert. Your task is to write the SQL query for the user query "
    "to retrieve data from a database."
)

# --- Output formats -----------------------------------------------------------------------------
FORMAT_PICO_REASONING = """The Assistant should show his thinking process in <think> </think> \
tags. The Assistant should return the final answer in JSON format in <answer> </answer> tags,
For example:
<think>
[thinking process]
</think>
<answer>
{
    "query": "...."
}
</answer>."""

FORMAT_QUERY_REASONING = """Show your work in <think> </think> tags. Your final response must be \
in JSON format within <answer> </answer> tags. For example,
<think>
[thinking process]
</think>
<answer>
{
    "query": "...."
}
</answer>."""

FORMAT_QUERY_DIRECT = """Your response must be in JSON format within <answer> </answer> tags. \
For example,
<answer>
{
    "query": "...."
}
</answer>"""

FORMAT_QUERY_NO_REASONING = """Your final response must be in JSON format within <answer> \
</answer> tags. For example,
<answer>
{
    "query": "...."
}
</answer>."""

FORMAT_SQL_REASONING = """Note: Using valid SQLite and understanding External Knowledge, answer \
the following questions for the tables provided above.

Show your work in <think> </think> tags. Your final response must be in JSON format within \
<answer> </answer>. For example,
<think>
[thinking process]
</think>
<answer>
{
    "sql": "SELECT ... (in one line)"
}
</answer>."""

FORMAT_SQL_NO_REASONING = """Note: Using valid SQLite and understanding External Knowledge, answer \
the following questions for the tables provided above.

Your final response must be in JSON format within <answer> </answer>. For example,
<answer>
{
    "sql": "SELECT ... (in one line)"
}
</answer>."""

# --- Notes appended to the output format --------------------------------------------------------
NOTE_BOOLEAN = (
    "Note: The query should use Boolean operators (AND, OR) and parentheses for grouping terms "
    "appropriately."
)
NOTE_DIRECT = (
    NOTE_BOOLEAN + " Directly provide the query (in the format mentioned above) without thinking "
    "and without any additional text."
)
NOTE_SPARSE = (
    "Note: The query will be directly used in a sparse retrieval system, so do not include any "
    "irrelevant terms."
)

# --- Input headers (the line before the rendered input) -----------------------------------------
HEADER_PICO = "User: The research is defined by the following PICO:"
HEADER_USER_QUERY = "Here's the user query:"
HEADER_SCIENTIFIC_CLAIM = "Here's the scientific claim:"
HEADER_CLAIM = "Here's the claim:"
HEADER_QUESTION = "Here's the question:"
HEADER_FINANCIAL_QUESTION = "Here's the financial question:"

# --- Assistant prefixes (the start of the assistant turn, supplied by the prompt) ---------------
PREFIX_THINK = "<think>\n"
PREFIX_ANSWER = "<answer>\n"
PREFIX_NONE = ""

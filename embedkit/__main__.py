from embedkit.cli import app

app(prog_name="embedkit")
